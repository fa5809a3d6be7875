# Shared by scripts/test and scripts/demo: install what is missing, nothing more.
# Debian 12 and Raspberry Pi OS (Bookworm). Sourced, not run.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$REPO/.venv"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# ensure_apt PACKAGE...: apt-get install the packages that are not installed yet.
ensure_apt() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    # Services are started by the tests and the demo themselves, never by apt.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# ensure_venv [EXTRAS]: a venv in .venv with dashsos installed (editable), with those extras.
ensure_venv() {
    local extras="${1:-}"
    python3 -c 'import ensurepip' 2>/dev/null || ensure_apt python3-venv
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    local stamp="$VENV/.dashsos-$(cat "$REPO/pyproject.toml" | sha256sum | cut -c1-12)-$extras"
    if [ ! -e "$stamp" ]; then
        echo "installing Python packages into $VENV"
        "$VENV/bin/pip" install -q --upgrade pip
        "$VENV/bin/pip" install -q -e "$REPO${extras:+[$extras]}"
        touch "$stamp"
    fi
}
