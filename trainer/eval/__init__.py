"""`prolix eval`: score a model or the checkpoints of a run on benchmark files and reasoning-gym
tasks, pass@k over n samples per problem. Sampling, scoring and pass@k themselves are the
trainer's (`prolix.trainer.evaluation`), shared with its periodic validation.

    options   the command line and every check made before a model is loaded (`EvalSpec`)
    worker    one engine process: load a checkpoint, sample and score its chunks
    report    summary.json, summary.md, the pass@k plot
    runner    resume, the work of each process, samples.jsonl, the progress bar
    command   `main`, the exit statuses
"""
