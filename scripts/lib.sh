# Shared by scripts/demo.sh and scripts/test.sh: installing what a fresh Debian machine lacks.

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }
apt_install() {
  command -v apt-get >/dev/null || { echo "missing: $* (no apt-get here; install them by hand)"; return 1; }
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# A C compiler and cargo (rustup's minimal profile when cargo is missing).
ensure_rust() {
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  local need=()
  command -v cc >/dev/null || need+=(build-essential)
  command -v cargo >/dev/null || command -v curl >/dev/null || need+=(curl ca-certificates)
  [ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
  if ! command -v cargo >/dev/null; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
}
