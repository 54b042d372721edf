#!/usr/bin/env bash
# Headless Chromium and its Python driver for tests/test_browser.py. Idempotent and quiet; a
# second run takes well under a second. Without apt or root the browser test skips and says why.
# Never runs `playwright install`: the driver drives Debian's /usr/bin/chromium.
set -u
VENV=${VENV:-.venv}
PLAYWRIGHT=1.65.2

if [ ! -x /usr/bin/chromium ]; then
	if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
		echo "browser_setup: installing Debian's chromium (once, about a minute)"
		{ DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 ||
			echo "browser_setup: apt-get install chromium failed; the browser test will skip"
	else
		echo "browser_setup: no /usr/bin/chromium and no root apt-get; the browser test will skip"
	fi
fi

if ! "$VENV/bin/python" - "$PLAYWRIGHT" 2>/dev/null <<'EOF'
import sys
from importlib.metadata import version
sys.exit(version("playwright") != sys.argv[1])
EOF
then
	echo "browser_setup: pip install playwright==$PLAYWRIGHT (its driver is in the wheel)"
	"$VENV/bin/python" -m pip install -q "playwright==$PLAYWRIGHT" ||
		echo "browser_setup: pip install playwright failed; the browser test will skip"
fi
exit 0
