"""A model file that fails its own rank on cue, for the restart tests (`--model
tests/scripts/chaos_model.py:build`). $CHAOS_KILLS is "RANK:STEPS[:HOW],...": in the job's
i-th start (restart i), rank RANK fails at its STEPS-th step of that start (a worker at a
training step, the server at an evaluation: run with eval_every 1), HOW being kill (SIGKILL,
the default), stop (SIGSTOP: a stall for the watchdog) or raise (an exception: an abort)."""
import os
import signal

import psframe as ps

BATCH = 8  # the run's batch size: smaller calls are the start-up checks' probes


class Chaos(ps.Model):
    """An MLP whose rank dies where the plan says; otherwise exactly the MLP."""

    def __init__(self):
        self.inner = ps.models.MLP([16, 12, 4])
        plan = [item.split(":") for item in os.environ.get("CHAOS_KILLS", "").split(",") if item]
        attempt = int(os.environ.get("PSFRAME_RESTART", "0"))
        rank = int(os.environ.get("PMI_RANK", "-1"))
        self.fail_at, self.how = None, "kill"
        if attempt < len(plan) and int(plan[attempt][0]) == rank:
            self.fail_at = int(plan[attempt][1])
            self.how = plan[attempt][2] if len(plan[attempt]) > 2 else "kill"
        self.steps = 0

    def _tick(self):
        self.steps += 1
        if self.steps != self.fail_at:
            return
        if self.how == "raise":
            raise RuntimeError(f"chaos: rank fails at step {self.steps}")
        os.kill(os.getpid(), signal.SIGSTOP if self.how == "stop" else signal.SIGKILL)

    def init_params(self, rng):
        return self.inner.init_params(rng)

    def loss_and_grad(self, params, X, y):
        if len(X) == BATCH:
            self._tick()
        return self.inner.loss_and_grad(params, X, y)

    def predict(self, params, X):
        return self.inner.predict(params, X)

    def evaluate(self, params, X, y, chunk=4096):
        self._tick()
        return self.inner.evaluate(params, X, y, chunk)


def build():
    return Chaos()
