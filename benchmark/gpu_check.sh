#!/usr/bin/env bash
# The GPU check as one command, for a GPU machine with no network whose python3 holds a CUDA build of torch:
# the GPU tests (both Atari files, the parallel variant, dqn.py), then dqn_atari_parallel.py's learning-phase
# speed against CleanRL's dqn_atari.py with 12 games and with one, 3 interleaved rounds each. Each part writes
# into OUT_DIR as it ends, so a run stopped at a time limit keeps what it finished.
#
#   benchmark/gpu_check.sh --prepare CLEANRL_CHECKOUT   # here, with network: wheels into .whl/, CleanRL into .cleanrl/
#   benchmark/gpu_check.sh OUT_DIR                      # there, with .whl and .cleanrl carried beside the tree
#   benchmark/gpu_check.sh --tests OUT_DIR              # there: the GPU tests alone
#   benchmark/gpu_check.sh --speed NAME OUT_DIR [SPEED_PY_OPTIONS] [-- FLAGS]  # there: one comparison alone, as
#                                                       # OUT_DIR/NAME (e.g. --threads 4, or -- --num-envs 12)
# One 600 s call holds the whole check, or the tests and two comparisons of 12 games, or two of one game.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    checkout=${2:?give a CleanRL checkout (its commit fe8d8a03 is the one the results compare with)}
    download() {  # wheels, without their dependencies, for the GPU machine's Python 3.12, into .whl/$1
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d ".whl/$1" "${@:2}"
    }
    versions() {  # name==version of each package after $1, as the environment of the python $1 holds it
        "$1" -c 'import sys, importlib.metadata as m; print(*(f"{p}=={m.version(p)}" for p in sys.argv[1:]))' "${@:2}"
    }
    cleanrl_python=benchmark/.cleanrl-venv/bin/python
    [ -x "$cleanrl_python" ] || { echo "no $cleanrl_python: run python benchmark/speed.py --setup-cleanrl" >&2; exit 1; }
    # what the machine's image lacks (torch, numpy, tensorboard, opencv and pytest are there), at the versions of
    # the environments the CPU results ran in: ours, and speed.py's for CleanRL (which needs numpy 1)
    needs="gymnasium ale-py tyro farama-notifications docstring-parser typeguard"
    download ours $(versions python3 $needs)
    download cleanrl $(versions "$cleanrl_python" $needs numpy)
    mkdir -p .cleanrl/cleanrl .cleanrl/cleanrl_utils
    cp "$checkout/cleanrl/dqn_atari.py" .cleanrl/cleanrl/
    cp "$checkout"/cleanrl_utils/{__init__,atari_wrappers,buffers}.py .cleanrl/cleanrl_utils/
    git -C "$checkout" rev-parse HEAD > .cleanrl/COMMIT
    du -sh .whl .cleanrl
    echo "ready: run benchmark/gpu_check.sh \$OUT there, carrying .whl and .cleanrl"
    exit 0
fi

mode=all name=""
case "${1:-}" in
    --tests) mode=tests; shift ;;
    --speed) mode=speed; name=${2:?give the comparison a name}; shift 2 ;;
esac
out=${1:?give a folder for the results}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
install() {  # once per machine: a later call there finds the packages in place
    [ -e "$2/.installed" ] && return
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" .whl/"$1"/*.whl
    touch "$2/.installed"
}
install ours /tmp/site
install cleanrl /tmp/cleanrl-site
export PYTHONPATH=/tmp/site
# CleanRL's pins ahead of ours (speed.py puts the CleanRL copy on PYTHONPATH), ale_py imported first as its envs need
cat > /tmp/cleanrl-python <<'EOF'
#!/bin/sh
PYTHONPATH="/tmp/cleanrl-site${PYTHONPATH:+:$PYTHONPATH}" exec python3 -c \
    "import ale_py, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')" "$@"
EOF
chmod +x /tmp/cleanrl-python

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  git log -1 --format='commit %H' 2>/dev/null || true
  echo "CleanRL copy of commit $(cat .cleanrl/COMMIT)"; nproc; } 2>&1 | tee "$out/machine.txt"

speed() {  # $1: the results folder's name; the rest: speed.py's options, then -- and dqn_atari_parallel.py's flags
    python3 benchmark/speed.py --cuda --no-sb3 --repeats 3 --cleanrl .cleanrl --cleanrl-python /tmp/cleanrl-python \
        --script dqn_atari_parallel.py --out "$out/$1" "${@:2}" 2>&1 | tee "$out/$1.txt"
}
tests() {
    python3 -m pytest -q -p no:cacheprovider -k "gpu or cuda" tests/test_dqn_atari.py tests/test_dqn_atari_parallel.py \
        tests/test_loading_and_failures.py tests/test_dqn.py 2>&1 | tee "$out/gpu-tests.txt"
}
case "$mode" in
    tests) tests ;;
    speed) speed "$name" "$@" ;;
    all)
        tests || true  # a failing test still leaves the speed to measure
        speed speed-12-games -- --num-envs 12 --replay-on-gpu
        speed speed-1-game ;;
esac
