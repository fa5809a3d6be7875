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

# ensure_leaflet: the console's street map library (Leaflet) from the npm registry, pinned
# by version and by the registry's own sha512 integrity, unpacked into the package's
# console/vendor/leaflet (git-ignored: fetched, never committed). npm is not needed.
LEAFLET_VERSION="1.9.4"
LEAFLET_INTEGRITY="sha512-nxS1ynzJOmOlHp+iL3FyWqK89GtNL8U8rvlMOsQdTTssxZwCXh8N2NB3GDQOL+YR3XnWyZAxwQixURb+FA74PA=="
ensure_leaflet() {
    local dest="$REPO/daemon/dashsos/dispatch/console/vendor/leaflet"
    local stamp="$dest/.version-$LEAFLET_VERSION"
    [ -e "$stamp" ] && return 0
    echo "fetching Leaflet $LEAFLET_VERSION from the npm registry"
    local tmp
    tmp="$(mktemp -d)"
    curl -fsSL --retry 3 -o "$tmp/leaflet.tgz" \
        "https://registry.npmjs.org/leaflet/-/leaflet-$LEAFLET_VERSION.tgz"
    local got
    got="sha512-$(openssl dgst -sha512 -binary "$tmp/leaflet.tgz" | base64 -w0)"
    if [ "$got" != "$LEAFLET_INTEGRITY" ]; then
        echo "Leaflet tarball integrity mismatch: $got" >&2
        rm -rf "$tmp"
        return 1
    fi
    tar -xzf "$tmp/leaflet.tgz" -C "$tmp" package/LICENSE package/dist/leaflet.js \
        package/dist/leaflet.css package/dist/images
    rm -rf "$dest"
    mkdir -p "$dest"
    cp -r "$tmp/package/dist/." "$dest/"
    cp "$tmp/package/LICENSE" "$dest/LICENSE"
    rm -rf "$tmp"
    touch "$stamp"
}
