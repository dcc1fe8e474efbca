"""The RESULT line of a script run by the end-to-end tests, one per rank under torchrun."""

import json
import os


def emit_result(res: dict) -> None:
    """One RESULT line; under torchrun into this rank's file (long lines of two ranks on one
    pipe interleave)."""
    line = "RESULT " + json.dumps(res) + "\n"
    out_dir = os.environ.get("TEST_RESULT_DIR")
    if out_dir:
        with open(os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.txt"), "w") as f:
            f.write(line)
    else:
        print(line, end="", flush=True)
