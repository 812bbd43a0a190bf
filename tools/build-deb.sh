#!/usr/bin/env bash
# Builds the Debian package: the release binary, its man pages and shell completions (generated
# from the clap definitions by `ublk-clone gen-docs`), then `cargo deb` (tools/setup-host.sh
# installs cargo-deb). Prints the path of the .deb.
# Usage: tools/build-deb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -z "${CARGO_TARGET_DIR:-}" ] || { echo "build-deb: unset CARGO_TARGET_DIR (the package's assets are under ./target)" >&2; exit 1; }
command -v cargo-deb >/dev/null || { echo "build-deb: cargo-deb missing; run tools/setup-host.sh" >&2; exit 1; }
cargo build --release --bins --quiet
rm -rf target/release/dist-docs
target/release/ublk-clone gen-docs target/release/dist-docs
gzip -9n target/release/dist-docs/man/*.1   # Debian policy: compressed man pages
rm -f target/debian/ublk-clone_*.deb
# cargo deb prints the package's path on stdout.
deb=$(cargo deb --no-build --strip --quiet --output target/debian/) || { echo "build-deb: cargo deb failed" >&2; exit 1; }
deb=$(printf '%s\n' "$deb" | tail -n1)
[ -f "$deb" ] || { echo "build-deb: cargo deb made no package ($deb)" >&2; exit 1; }
echo "$deb"
