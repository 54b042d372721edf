#!/usr/bin/env bash
# Headless Chromium for tests/test_browser.py (its Python driver, playwright, comes from
# requirements.lock). Idempotent and quiet; a second run takes well under a second. Without apt
# or root the browser test skips and says why.
# Never runs `playwright install`: the driver drives Debian's /usr/bin/chromium.
set -u
VENV=${VENV:-.venv}

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

# The Python driver (playwright) is a locked dev dependency: requirements.lock, `make setup`.
if ! "$VENV/bin/python" -c "import playwright" 2>/dev/null; then
	echo "browser_setup: playwright is not in $VENV; run make setup (it installs requirements.lock)"
fi
exit 0
