#!/usr/bin/env bash
# The main job on an embedded default: install what svsp needs, build it, and run a
# demo domain under ./demo (nothing outside it is touched): three file-backed pools,
# the setup vdisk mirrored on all three, a thick, a thin and a mirrored vdisk written
# and verified through the data API, a PiT and a snapshot of it, the NBD exports,
# then `svsp-ctl status`.
# Re-running reuses what exists.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
swift build -c release --product svsp-ctl 2>&1 | tail -n 1
CTL="$PWD/.build/release/svsp-ctl"
DEMO=$(mkdir -p "${SVSP_DEMO_DIR:-./demo}" && cd "${SVSP_DEMO_DIR:-./demo}" && pwd)
export SVSP_DIR="$DEMO/state"
export SVSP_PROFILES="$PWD/hardware-profiles"

[ -f "$SVSP_DIR/domain.json" ] || "$CTL" domain init --dir "$SVSP_DIR" --name demo
"$CTL" serve 2>"$DEMO/serve.log" &
DAEMON=$!
trap 'kill -TERM $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null || true' EXIT
for _ in $(seq 100); do "$CTL" status >/dev/null 2>&1 && break; sleep 0.1; done
"$CTL" status >/dev/null || { cat "$DEMO/serve.log"; exit 1; }

for p in a b c; do
    "$CTL" pool show "pool-$p" >/dev/null 2>&1 ||
        "$CTL" pool create "pool-$p" --array-profile file-backed --lun "$DEMO/lun-$p.img" --create-size 256M
done
if "$CTL" status | grep -q '^setup vdisk: none'; then
    "$CTL" domain setup-vdisk create --pool pool-a --pool pool-b --pool pool-c
fi
"$CTL" vdisk show demo-vd >/dev/null 2>&1 || "$CTL" vdisk create demo-vd --pool pool-a --size 128M
"$CTL" vdisk show demo-thin >/dev/null 2>&1 || "$CTL" vdisk create demo-thin --pool pool-b --size 1G --thin
"$CTL" vdisk show demo-mirror >/dev/null 2>&1 || "$CTL" vdisk create demo-mirror --pool pool-b --mirror-pool pool-c --size 64M
for v in demo-vd demo-thin demo-mirror; do "$CTL" vdisk export "$v" >/dev/null; done
"$CTL" vdisk verify demo-vd
"$CTL" vdisk verify demo-thin --size 16M
"$CTL" vdisk verify demo-mirror
"$CTL" mirror status
# A PiT of the thin vdisk (no data copied; the next run's writes are redirected), a
# read-only snapshot of it, and the list.
"$CTL" pit list demo-thin --json | grep -q '"demo-pit"' || "$CTL" pit create demo-thin --name demo-pit
"$CTL" vdisk show demo-snap >/dev/null 2>&1 || "$CTL" snapshot create demo-snap --pit demo-pit
"$CTL" pit list
if command -v nbdinfo >/dev/null; then
    echo "NBD exports on $SVSP_DIR/nbd.sock:"
    nbdinfo --list "nbd+unix:///?socket=$SVSP_DIR/nbd.sock" | grep -E '^export=|export-size'
fi
if command -v qemu-io >/dev/null; then
    echo "qemu-io through NBD on demo-mirror:"
    qemu-io -f raw "nbd+unix:///demo-mirror?socket=$SVSP_DIR/nbd.sock" -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' |
        grep -E '^(wrote|read)'
fi
"$CTL" status
