#!/usr/bin/env bash
# The main job on an embedded default: install what svsp needs, build it, and run a
# verified raw benchmark on a file-backed LUN under ./demo (nothing outside it is touched).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
swift build -c release --product svsp-ctl 2>&1 | tail -n 2
CTL=.build/release/svsp-ctl
DEMO=${SVSP_DEMO_DIR:-./demo}
mkdir -p "$DEMO"
LUN="$DEMO/lun0.img"
[ -f "$LUN" ] || echo "creating $LUN (256M, preallocated)"
"$CTL" bench raw --target "$LUN" --size 256M --rw randwrite --bs 4k --qd 32 --verify
"$CTL" bench raw --target "$LUN" --size 256M --rw randrw --bs 4k --qd 32 --seconds 5
