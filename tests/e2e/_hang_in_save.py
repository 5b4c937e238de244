"""`python tests/e2e/_hang_in_save.py ARGS...` is `diffusion-jax ARGS...` with one fault planted for
test_reliability.py: when orbax is about to finalize (rename into place) the checkpoint of step
$DJ_HANG_AT_STEP, this writes the file $DJ_HANG_MARKER and blocks forever, so the test can kill -9 the
process while that save is unfinished. Nothing else changes.
"""
import os
import sys
import time

from orbax.checkpoint._src.path import atomicity

from diffusion_jax.cli.main import main

_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def _hanging_finalize(self):
    if self._final_path.name == os.environ["DJ_HANG_AT_STEP"]:
        with open(os.environ["DJ_HANG_MARKER"], "w") as f:
            f.write(str(self._tmp_path))
        while True:
            time.sleep(60)
    return await _finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = _hanging_finalize

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
