"""Run by the distributed tests under torchrun (and alone): signround.run on a tiny model folder, the rank
named by KILL_RANK killing itself with SIGKILL after block KILL_AFTER; rank 0 prints the report as JSON."""

import json
import os
import signal
import sys

from tiny_models import calib_ids

import signround


def main() -> None:
    folder, out = sys.argv[1], sys.argv[2]
    kill_after, kill_rank = int(os.environ.get("KILL_AFTER", "-1")), int(os.environ.get("KILL_RANK", "1"))

    def crash(index, report):
        if index == kill_after and int(os.environ.get("RANK", "0")) == kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)

    budget = {"target_bits": float(os.environ["TARGET_BITS"]), "options": ("W2A16G32", "W4A16G32", "W8A16G32")} if "TARGET_BITS" in os.environ else {}
    config = signround.QuantConfig(scheme="W4A16G32", iters=6, nsamples=8, seqlen=32, batch_size=4, **budget)
    run = signround.RunConfig(progress=False, compile=False, amp=os.environ.get("AMP", "off"), offload=os.environ.get("OFFLOAD") == "1")
    report = signround.run(folder, out, config, run, calibration=calib_ids(8, 32), on_block_done=crash)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"losses": report.block_losses, "steps": report.tuning_steps, "plan": report.plan}))


if __name__ == "__main__":
    main()
