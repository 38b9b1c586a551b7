#!/usr/bin/env bash
# Check README.md's "Install into your own environment" as a new user would follow it.
#
# Usage: scripts/check_install.sh        (PYTHON=python3.11 to choose the interpreter)
#
# In a temporary folder: a copy of this checkout's tracked files, then the README's install
# block run literally (a fresh virtual environment, TensorFlow, the Horovod build, the package
# with its data extra), then `import dho2_tf` and the README's Keras example with its epoch
# count shortened from 30 to 2, on 1 process and under `horovodrun -np 2`, both run from outside
# the copy so the installed package is the one imported. Takes several minutes (mostly the
# Horovod build) and needs the network (PyPI); not part of `make test`. Exits non-zero on the
# first failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d -t dho2_install.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
echo "[check_install] working in $WORK"

mkdir -p "$WORK/src" "$WORK/run"
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 tar cf -) | tar xf - -C "$WORK/src"

# The bash block of the README's install section, exactly as written.
"$PY" - "$ROOT/README.md" "$WORK/install.sh" <<'EOF'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
section = text[text.index("## Install into your own environment"):]
section = section[:section.index("\n## ", 5)]
block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
open(sys.argv[2], "w").write("set -euxo pipefail\n" + block)
EOF
echo "[check_install] the README's install block:"
sed 1d "$WORK/install.sh"
(cd "$WORK/src" && PATH="/usr/bin:/bin:$PATH" bash "$WORK/install.sh")

VPY="$WORK/src/venv/bin/python"
cd "$WORK/run"
"$VPY" -c "import dho2_tf, horovod.tensorflow, mnist1d; print('[check_install] import dho2_tf', dho2_tf.__version__, 'from', dho2_tf.__file__)"
"$VPY" - "$ROOT/README.md" "$WORK/run/example.py" <<'EOF'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
section = text[text.index("## Using DHO2 in your Keras code"):]
block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
assert "epochs=30" in block
open(sys.argv[2], "w").write(block.replace("epochs=30", "epochs=2"))
EOF
echo "[check_install] README Keras example, 2 epochs, 1 process"
"$VPY" example.py
echo "[check_install] README Keras example, 2 epochs, horovodrun -np 2"
"$WORK/src/venv/bin/horovodrun" --gloo -np 2 -H localhost:2 "$VPY" example.py
echo "[check_install] OK"
