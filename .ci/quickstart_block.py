"""Prints the N-th ```bash block (1-based) of README.md's '## Quick start' section."""

import os
import re
import sys

readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
n = int(sys.argv[1])
if len(blocks) < n:
    sys.exit(f"README.md's Quick start has {len(blocks)} bash blocks; block {n} was asked for.")
print(blocks[n - 1], end="")
