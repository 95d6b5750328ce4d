# Sourced by scripts/demo and scripts/test: makes sure cargo is reachable.
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install a Rust toolchain (rustup, Rust >= 1.88) first" >&2
  exit 2
fi
