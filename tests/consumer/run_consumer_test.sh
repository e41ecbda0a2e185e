#!/usr/bin/env bash
# Installs the current hesse build into a temporary DESTDIR (never the real
# prefix), then configures, builds and runs tests/consumer against that copy
# through pkg-config, the way a user's project would find hesse.
#   usage: run_consumer_test.sh <hesse build dir> <consumer source dir> [meson setup args...]
set -euo pipefail
build_dir=$1
consumer_src=$2
shift 2

work=$(mktemp -d "${TMPDIR:-/tmp}/hesse-consumer.XXXXXX")
trap 'rm -rf "$work"' EXIT
destdir=$work/destdir

# 1. install: headers, libhesse, hesse.pc under $destdir/<prefix>
meson install -C "$build_dir" --no-rebuild --quiet --destdir "$destdir" >"$work/install.log" 2>&1 || {
  cat "$work/install.log"; echo "consumer: meson install failed"; exit 1; }

pc=$(find "$destdir" -name hesse.pc -print -quit)
lib=$(find "$destdir" -name 'libhesse.so*' -print -quit)
hdr=$(find "$destdir" -path '*/include/hesse/hesse.hpp' -print -quit)
for f in "$pc" "$lib" "$hdr"; do
  [ -n "$f" ] || { echo "consumer: install is missing hesse.pc, libhesse.so or include/hesse/hesse.hpp"; find "$destdir"; exit 1; }
done

# 2. hesse.pc names the configured prefix; point it at the DESTDIR copy
#    (what a relocatable install or PKG_CONFIG_SYSROOT_DIR would do).
prefix=$(sed -n 's/^prefix=//p' "$pc")
sed -i "s|^prefix=.*|prefix=$destdir$prefix|" "$pc"
export PKG_CONFIG_PATH=$(dirname "$pc")
export LD_LIBRARY_PATH=$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
echo "consumer: pkg-config --cflags --libs hesse: $(pkg-config --cflags --libs hesse)"

# 3. configure, build and run the consumer against the installed copy
meson setup "$work/build" "$consumer_src" "$@" >"$work/setup.log" 2>&1 || {
  cat "$work/setup.log"; echo "consumer: meson setup failed"; exit 1; }
meson compile -C "$work/build" >"$work/compile.log" 2>&1 || {
  cat "$work/compile.log"; echo "consumer: build failed"; exit 1; }

out=$("$work/build/consumer") || { echo "$out"; echo "consumer: the program failed"; exit 1; }
echo "$out"
# it must have linked the installed library, not some other libhesse
libs=$(ldd "$work/build/consumer")
grep -q "libhesse.*=> $destdir" <<<"$libs" || { echo "$libs"; echo "consumer: not linked to the installed copy"; exit 1; }
grep -qx 'consumer ok' <<<"$out"
