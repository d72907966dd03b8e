#!/usr/bin/env python3
"""Renders a dataset card as a reader sees it: the Markdown (front matter
aside) with its images, as a page in headless Chromium, and a screenshot.

    python3 scripts/card-screenshot.py EXPORT_DIR OUT.png   # needs `markdown` (PyPI) and Debian's chromium
"""
import os
import subprocess
import sys
import tempfile

import markdown

export_dir, png = sys.argv[1], os.path.abspath(sys.argv[2])
with open(os.path.join(export_dir, "README.md")) as f:
    card = f.read()
body = card.split("---\n", 2)[2] if card.startswith("---\n") else card
html = markdown.markdown(body, extensions=["tables", "fenced_code"])
style = ("body{font-family:sans-serif;max-width:900px;margin:24px auto;line-height:1.45}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}")
page = os.path.join(os.path.abspath(export_dir), ".card-preview.html")
with open(page, "w") as f:
    f.write(f"<!doctype html><meta charset=utf-8><style>{style}</style>{html}")
try:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                        "--hide-scrollbars", "--window-size=1000,6000", f"--screenshot={png}", f"file://{page}"],
                       check=True, capture_output=True, timeout=120)
finally:
    os.remove(page)
print(png)
