#!/usr/bin/env python3
"""prefgen's GPU check: prefgen against transformers on the same machine, in
the same dtype, every number in one report.

1. Parity: the tiny Llama-3, Gemma-2 and ArmoRM fixtures; last-position
   logits, greedy tokens and scores, in bf16 and f32.
2. Generation throughput: a random-weight model of Llama-3-8B's shape,
   random prompts run to length (end of turn ignored), prefgen's engine
   against transformers' `generate`, at each batch size.
3. Scoring throughput: an ArmoRM of that shape on conversations of a few
   hundred tokens, prefgen batched against the seed's one-at-a-time loop.

Each step runs in its own process (prefgen, or reference.py for
transformers), measured alike: wall clock, and peak memory polled from
nvidia-smi (the GPU) or /proc (the CPU). The report (report.json,
report.md) is rewritten after every step, so a check cut short keeps what it
measured; a failed or timed-out step is reported and the rest still run.

    python3 check.py --prefgen ./prefgen --fixtures DIR --data DIR --out DIR   # on the GPU
    python3 check.py --tiny --cpu ...                                          # the rehearsal
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# What each mode measures: the real shapes on a GPU, small ones on a CPU.
SIZES = {
    "full": dict(shape="8b", batches=[64, 256], input_len=256, output_len=256, conversations=1000, score_batch=32),
    "tiny": dict(shape="tiny", batches=[4, 16], input_len=32, output_len=32, conversations=64, score_batch=16),
}
# Agreement asked of parity. In f32 the two differ only in the order of the
# sums. bf16 rounds every activation to 8 bits, and prefgen and torch round
# at other places, so bf16 is judged against transformers' f32: prefgen's
# bf16 may be at most BF16_SLACK times as far from it as transformers' bf16.
# The maxima of a few dozen values vary by 2x between two correct bf16
# implementations; a bug is 10x and more (the bf16 softmax this check
# found was 200x).
F32_TOLERANCE = 1e-3
BF16_SLACK = 3.0


class Check:
    def __init__(self, args):
        self.args = args
        self.device = "cpu" if args.cpu else "cuda"
        self.size = SIZES["tiny" if args.tiny else "full"]
        self.deadline = time.monotonic() + args.budget_s
        self.work = args.work
        self.logs = os.path.join(args.out, "logs")
        os.makedirs(self.work, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        self.report = {"mode": "tiny" if args.tiny else "full", "device": self.device, "sizes": self.size,
                       "budget_s": args.budget_s, "steps": {}, "parity": [], "generation": [], "scoring": {}}

    # --- running and measuring a step -----------------------------------

    def run(self, name, cmd, limit_s):
        """Runs one step with at most `limit_s` seconds (less if the budget
        has less left); records it and returns its JSON output or None."""
        left = self.deadline - time.monotonic()
        timeout = max(1.0, min(limit_s, left))
        out_path, err_path = os.path.join(self.logs, f"{name}.out"), os.path.join(self.logs, f"{name}.err")
        step = {"cmd": " ".join(cmd), "timeout_s": round(timeout, 1)}
        if left < 5:
            step["error"] = "skipped: the check's time budget was spent"
            self.record(name, step)
            return None
        start = time.monotonic()
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err)
            peak = Peak(proc.pid, self.device)
            rc, rss_mib = wait(proc, timeout)
            if rc is None:
                step["error"] = f"timed out after {timeout:.0f} s"
            peak.stop()
        # On the CPU the kernel's own count of the peak resident set.
        step.update(rc=rc, wall_s=round(time.monotonic() - start, 2), peak_mib=rss_mib if self.device == "cpu" else peak.mib)
        result = None
        with open(out_path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        if rc == 0 and lines:
            try:
                result = json.loads(lines[-1])
            except json.JSONDecodeError:
                step["error"] = f"its last line is not JSON: {lines[-1][:200]}"
        elif "error" not in step:
            with open(err_path) as f:
                step["error"] = f"exit {rc}: " + f.read()[-2000:].strip()
        if result is not None:
            step["result"] = result
        self.record(name, step)
        return result if "error" not in step else None

    def record(self, name, step):
        self.report["steps"][name] = step
        status = step.get("error", "ok")
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {status.splitlines()[0] if status else status} "
              f"({step.get('wall_s', 0)} s)", flush=True)
        self.write()

    def prefgen(self, *args):
        return [self.args.prefgen, *args]

    def reference(self, *args):
        return [sys.executable, os.path.join(HERE, "reference.py"), *args, "--device", self.device]

    def fixture(self, name):
        return os.path.join(self.args.fixtures, name)

    # --- the sections ----------------------------------------------------

    def environment(self):
        self.report["reference_env"] = self.run("env", self.reference("env"), 120)
        version = subprocess.run([self.args.prefgen, "--version"], capture_output=True, text=True)
        self.report["prefgen"] = (version.stdout or version.stderr).strip()
        if self.device == "cuda":
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True)
            self.report["gpu"] = smi.stdout.strip() or smi.stderr.strip()

    def parity(self):
        cases = load_json(self.fixture("tiny-llama3-reference.json"))["cases"]
        prompts = os.path.join(self.work, "parity-prompts.jsonl")
        with open(prompts, "w") as f:
            f.writelines(json.dumps({"prompt": c["prompt"]}) + "\n" for c in cases)
        convs = load_json(self.fixture("tiny-armorm-reference.json"))["cases"]
        rows = os.path.join(self.work, "parity-rows.json")
        with open(rows, "w") as f:
            json.dump([{"prompt": c["prompt"], "all_generated_responses": [c["response"]]} for c in convs], f)
        # f32 first: bf16 is judged by its distance from transformers' f32.
        for dtype in ("f32", "bf16"):
            for name in ("llama3", "gemma2", "armorm"):
                self.parity_one(name, dtype, prompts if name != "armorm" else rows)

    def parity_one(self, name, dtype, inputs):
        model, tag = self.fixture(f"tiny-{name}"), f"{name}-{dtype}"
        path = lambda who, d=dtype: os.path.join(self.work, f"parity-{name}-{d}-{who}.json")  # noqa: E731
        if name == "armorm":
            theirs = ["score", "--model", model, "--rows", inputs]
            ours = ["infer", "score", model, inputs]
            read = lambda p: [s for row in load_json(p) for s in (row if isinstance(row, list) else row["all_rm_scores"])]  # noqa: E731,E501
        else:
            theirs = ["parity-lm", "--model", model, "--prompts", inputs, "--max-new-tokens", "32"]
            ours = ["infer", "generate", model, inputs, "--logits", "--max-tokens", "32", "--batch-size", "8"]
            read = read_jsonl
        ref = self.run(f"parity-{tag}-transformers", self.reference(*theirs, "--dtype", dtype, "--out", path("transformers")), 180)
        got = self.run(f"parity-{tag}-prefgen", self.prefgen(*ours, "--dtype", dtype, "--out", path("prefgen")), 120)
        entry = {"model": f"tiny-{name}", "dtype": dtype}
        if ref is not None and got is not None:
            exact = path("transformers", "f32")
            exact = read(exact) if dtype == "bf16" and os.path.exists(exact) else None
            entry.update(compare(read(path("transformers")), read(path("prefgen")), exact))
        self.report["parity"].append(entry)
        self.write()

    def models(self):
        """The random-weight models both throughput sections run."""
        made = self.run("make-models", self.reference(
            "make-model", "--shape", self.size["shape"], "--tokenizer", self.fixture("tiny-llama3"),
            "--out", os.path.join(self.work, "models")), 300)
        self.report["models"] = made
        return made is not None

    def generation(self):
        s, model = self.size, os.path.join(self.work, "models", "llama")
        lens = ["--input-len", str(s["input_len"]), "--output-len", str(s["output_len"])]
        ref = self.run("generate-transformers", self.reference(
            "bench-generate", "--model", model, "--dtype", "bf16",
            *[a for b in s["batches"] for a in ("--batch-size", str(b))], *lens), 240)
        theirs = {r["batch_size"]: r for r in (ref or {}).get("runs", [])}
        for b in s["batches"]:
            # 120 s each, so a slow engine leaves the scoring its share.
            got = self.run(f"generate-prefgen-{b}", self.prefgen(
                "infer", "bench", model, "--dtype", "bf16", "--batch-size", str(b), *lens), 120)
            ours = (got or {}).get("runs", [{}])[0]
            entry = {"batch_size": b, "input_len": s["input_len"], "output_len": s["output_len"],
                     "prefgen_tokens_per_s": ours.get("output_tokens_per_s"),
                     "transformers_tokens_per_s": theirs.get(b, {}).get("output_tokens_per_s"),
                     "prefgen_peak_mib": self.report["steps"][f"generate-prefgen-{b}"].get("peak_mib"),
                     "transformers_peak_mib": self.report["steps"]["generate-transformers"].get("peak_mib")}
            step = self.report["steps"][f"generate-prefgen-{b}"]
            if step.get("error", "").startswith("timed out"):
                # Still a number: fewer tokens than these in that time.
                entry["prefgen_tokens_per_s_below"] = b * s["output_len"] / step["wall_s"]
            if entry["prefgen_tokens_per_s"] and entry["transformers_tokens_per_s"]:
                entry["ratio"] = entry["prefgen_tokens_per_s"] / entry["transformers_tokens_per_s"]
            self.report["generation"].append(entry)
            self.write()

    def scoring(self):
        s, model = self.size, os.path.join(self.work, "models", "armorm")
        rows = os.path.join(self.work, "score-rows.json")
        with open(rows, "w") as f:
            json.dump(conversations(self.args.data, s["conversations"]), f)
        theirs, ours = os.path.join(self.work, "score-transformers.json"), os.path.join(self.work, "score-prefgen.json")
        got = self.run("score-prefgen", self.prefgen(
            "infer", "score", model, rows, "--dtype", "bf16", "--batch-size", str(s["score_batch"]), "--out", ours), 240)
        ref = self.run("score-transformers", self.reference(
            "score", "--model", model, "--rows", rows, "--dtype", "bf16", "--out", theirs), 240)
        entry = {"conversations": s["conversations"], "prefgen_batch_size": s["score_batch"],
                 "prefgen_peak_mib": self.report["steps"]["score-prefgen"].get("peak_mib"),
                 "transformers_peak_mib": self.report["steps"]["score-transformers"].get("peak_mib")}
        if got is not None:
            entry.update(tokens=got["tokens"], prefgen_sequences_per_s=got["sequences_per_s"])
        if ref is not None:
            entry["transformers_sequences_per_s"] = ref["sequences_per_s"]
        if got is not None and ref is not None:
            entry["ratio"] = got["sequences_per_s"] / ref["sequences_per_s"]
            a = [x for r in load_json(theirs) for x in r]
            b = [x for r in load_json(ours) for x in r["all_rm_scores"]]
            entry.update(max_score_diff=compare(a, b)["max_diff"], score_range=[min(a), max(a)])
        self.report["scoring"] = entry
        self.write()

    # --- the report --------------------------------------------------------

    def write(self):
        with open(os.path.join(self.args.out, "report.json"), "w") as f:
            json.dump(self.report, f, indent=2)
        with open(os.path.join(self.args.out, "report.md"), "w") as f:
            f.write(markdown(self.report))

    def passed(self):
        failed = [n for n, s in self.report["steps"].items() if "error" in s]
        bad = [f"{p['model']} {p['dtype']}" for p in self.report["parity"] if not p.get("ok")]
        return not failed and not bad


def wait(proc, timeout):
    """Waits for `proc` at most `timeout` seconds, killing it then: its exit
    status (None when killed) and its peak resident set in MiB."""
    end = time.monotonic() + timeout
    killed = False
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return (None if killed else proc.returncode), usage.ru_maxrss // 1024
        if time.monotonic() > end and not killed:
            proc.kill()
            killed = True
        time.sleep(0.02)


class Peak:
    """The peak GPU memory of a process, polled from nvidia-smi's
    per-process figure."""

    def __init__(self, pid, device):
        self.pid, self.device, self.mib, self.done = pid, device, 0, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def sample(self):
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid, _, used = line.partition(",")
            if pid.strip() == str(self.pid) and used.strip().isdigit():
                return int(used)
        return 0

    def poll(self):
        while self.device == "cuda" and not self.done.is_set():
            self.mib = max(self.mib, self.sample())
            self.done.wait(0.25)

    def stop(self):
        self.done.set()
        self.thread.join()


def compare(theirs, ours, exact=None):
    """Agreement of transformers' and prefgen's runs over the same inputs:
    prompt rows (token ids, logits, greedy tokens) or scores. With `exact`
    (transformers' f32 run), each side's distance from it too."""
    lm = bool(theirs) and isinstance(theirs[0], dict)
    values = (lambda rows: [x for r in rows for x in r["logits"]]) if lm else list  # noqa: E731
    diff = lambda a, b: max(abs(x - y) for x, y in zip(values(a), values(b)))  # noqa: E731
    out = {"count": len(theirs), "max_diff": diff(theirs, ours)}
    same = len(theirs) == len(ours)
    if lm:
        out["same_input_ids"] = sum(a["input_ids"] == b["input_ids"] for a, b in zip(theirs, ours))
        out["identical_responses"] = sum(a["output_ids"] == b["output_ids"] for a, b in zip(theirs, ours))
        agree = total = 0
        for a, b in zip(theirs, ours):
            n = 0
            while n < min(len(a["output_ids"]), len(b["output_ids"])) and a["output_ids"][n] == b["output_ids"][n]:
                n += 1
            agree, total = agree + n, total + len(a["output_ids"])
        out["agreeing_tokens"] = agree / max(total, 1)
        same = same and out["same_input_ids"] == len(theirs)
    if exact is None:
        out["ok"] = same and out["max_diff"] <= F32_TOLERANCE
    else:
        out["prefgen_error"], out["transformers_error"] = diff(exact, ours), diff(exact, theirs)
        out["ok"] = same and out["prefgen_error"] <= BF16_SLACK * out["transformers_error"]
    return out


def conversations(data, n):
    """`n` SimPO rows of one response each, from MT-Bench and Vicuna-Bench
    questions: a question, and a response of one to three other questions'
    text with connecting words, a few hundred tokens."""
    texts = []
    for name in ("mt_bench_questions.jsonl", "vicuna_bench_questions.jsonl"):
        for q in read_jsonl(os.path.join(data, name)):
            texts.extend(q.get("turns") or [q.get("text", "")])
    rows = []
    for i in range(n):
        parts = [texts[(i * 7 + j * 13 + 1) % len(texts)] for j in range(1 + i % 3)]
        response = "Here is how I would approach it. " + " Furthermore, consider this: ".join(parts)
        rows.append({"prompt": texts[i % len(texts)], "all_generated_responses": [response]})
    return rows


def markdown(r):
    fmt = lambda x, d=1: "—" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))  # noqa: E731
    sci = lambda x: "—" if x is None else f"{x:.2e}"  # noqa: E731
    env = r.get("reference_env") or {}
    lines = [f"# prefgen GPU check ({r['mode']}, {r['device']})", "",
             f"- prefgen: {r.get('prefgen', '—')}",
             f"- GPU: {r.get('gpu', env.get('gpu', '—'))}",
             f"- reference: torch {env.get('torch', '—')}, transformers {env.get('transformers', '—')}, "
             f"CUDA {env.get('cuda', '—')}", "",
             "## Parity: tiny fixtures, prefgen against transformers, same device and dtype", "",
             "| model | dtype | same input ids | identical greedy responses | agreeing tokens | "
             "largest logit (score) difference | bf16 error vs transformers f32: prefgen / transformers | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for p in r["parity"]:
        if "count" not in p:
            lines.append(f"| {p['model']} | {p['dtype']} | not run: see the failed steps | | | | | False |")
            continue
        n = p["count"]
        lm = (f"{p['same_input_ids']}/{n} | {p['identical_responses']}/{n} | {p['agreeing_tokens']:.0%}"
              if "same_input_ids" in p else f"— | — ({n} scores) | —")
        bf16 = f"{sci(p['prefgen_error'])} / {sci(p['transformers_error'])}" if "prefgen_error" in p else "—"
        lines.append(f"| {p['model']} | {p['dtype']} | {lm} | {sci(p['max_diff'])} | {bf16} | {p['ok']} |")
    m = r.get("models") or {}
    lines += ["", f"## Generation: random-weight Llama, shape `{r['sizes']['shape']}` "
              f"({m.get('parameters', 0) / 1e9:.2f} B parameters), bf16, end of turn ignored", "",
              "| batch | in / out tokens | prefgen tokens/s | transformers tokens/s | ratio | prefgen peak MiB | transformers peak MiB |",
              "|---|---|---|---|---|---|---|"]
    for g in r["generation"]:
        ours = fmt(g["prefgen_tokens_per_s"]) if "prefgen_tokens_per_s_below" not in g else f"< {g['prefgen_tokens_per_s_below']:.0f} (timed out)"
        lines.append(f"| {g['batch_size']} | {g['input_len']} / {g['output_len']} | {ours} | "
                     f"{fmt(g['transformers_tokens_per_s'])} | {fmt(g.get('ratio'), 2)} | {fmt(g['prefgen_peak_mib'])} | "
                     f"{fmt(g['transformers_peak_mib'])} |")
    s = r["scoring"]
    if s:
        lines += ["", "## Scoring: random-weight ArmoRM on that backbone, bf16", "",
                  "| conversations | tokens | prefgen sequences/s | transformers sequences/s (batch 1) | ratio (goal 20) | "
                  "largest score difference | prefgen peak MiB | transformers peak MiB |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {s['conversations']} | {fmt(s.get('tokens'))} | {fmt(s.get('prefgen_sequences_per_s'))} "
                  f"(batch {s['prefgen_batch_size']}) | {fmt(s.get('transformers_sequences_per_s'))} | "
                  f"{fmt(s.get('ratio'), 2)} | {sci(s.get('max_score_diff'))} | {fmt(s['prefgen_peak_mib'])} | "
                  f"{fmt(s['transformers_peak_mib'])} |"]
    failed = {n: st for n, st in r["steps"].items() if "error" in st}
    lines += ["", "## Steps", "", "| step | seconds | peak MiB | status |", "|---|---|---|---|"]
    for n, st in r["steps"].items():
        status = st.get("error", "ok").splitlines()[0][:120] if st.get("error") else "ok"
        lines.append(f"| {n} | {st.get('wall_s', '—')} | {st.get('peak_mib', '—')} | {status} |")
    for n, st in failed.items():
        lines += ["", f"### {n} failed", "", f"`{st['cmd']}`", "", "```", st["error"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefgen", required=True, help="the prefgen binary (the CUDA build on a GPU)")
    ap.add_argument("--fixtures", required=True, help="the folder of tiny-llama3, tiny-gemma2, tiny-armorm")
    ap.add_argument("--data", required=True, help="the folder of mt_bench_questions.jsonl and vicuna_bench_questions.jsonl")
    ap.add_argument("--out", required=True, help="where report.json, report.md and the logs go")
    ap.add_argument("--work", help="where the models and intermediate files go (default: OUT/work); removed after")
    ap.add_argument("--tiny", action="store_true", help="small shapes (the rehearsal)")
    ap.add_argument("--cpu", action="store_true", help="on the CPU (the rehearsal)")
    ap.add_argument("--budget-s", type=float, default=450, help="the whole check's time; steps get what is left")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (the models are large)")
    args = ap.parse_args()
    args.work = args.work or os.path.join(args.out, "work")
    check = Check(args)
    try:
        check.environment()
        check.parity()
        if check.models():
            check.generation()
            check.scoring()
    finally:
        check.write()
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    with open(os.path.join(args.out, "report.md")) as f:
        print(f.read())
    return 0 if check.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
