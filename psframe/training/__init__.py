"""Training: the run options, their checks, the plan of roles, and train() itself.

options: RunOptions, the one table of run options; checks: what can be wrong with a call;
plan: RunPlan and the parallel plan; planning: a call checked, then built into its RunPlan;
roles: the server and workers built from a plan; failures: errors agreed on every rank,
clean stops, aborts; train: the entry point.
"""
from .failures import abort_job, agree_or_raise, stop_on_signals
from .options import RunOptions
from .plan import ParallelPlan, RunPlan
from .train import train

__all__ = ["train", "RunOptions", "RunPlan", "ParallelPlan", "abort_job", "agree_or_raise",
           "stop_on_signals"]
