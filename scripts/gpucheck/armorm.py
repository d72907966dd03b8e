"""ArmoRM's heads (LlamaForRewardModelWithGating, as RLHFlow's
modeling_custom.py defines them) over a Llama backbone's last hidden states:
the reference that the tiny fixture's scores and the GPU check's come from."""

GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def head_names(n_hidden):
    """The heads' tensor names in the checkpoint."""
    names = ["regression_layer.weight", "gating.logit_scale", "reward_transform_matrix"]
    for n in range(n_hidden + 1):
        names += [f"gating.layers.{n}.weight", f"gating.layers.{n}.bias"]
    return names


def score(h, input_ids, pattern, heads, n_hidden, temperature):
    """The score of one conversation from its hidden states `h` (len, hidden),
    in f32: rewards read at the last token, the gate at the last end of a user
    turn (`pattern`)."""
    import torch

    h = h.float()
    j = max(k for k in range(len(input_ids) - len(pattern) + 1) if input_ids[k:k + len(pattern)] == pattern)
    rewards = h[-1] @ heads["regression_layer.weight"].float().T
    g = h[j]
    for n in range(n_hidden + 1):
        g = g @ heads[f"gating.layers.{n}.weight"].float().T + heads[f"gating.layers.{n}.bias"].float()
        if n < n_hidden:
            g = torch.relu(g)
    g = torch.softmax(g / temperature, dim=0) * heads["gating.logit_scale"].float()[0]
    return float((g * (rewards @ heads["reward_transform_matrix"].float())).sum())
