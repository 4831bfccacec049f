"""Training adapters: data in, a trained adapter and its reports out.

`data` and `builtin_data` turn files, hub data sets and the builtin real tasks into
tokenized splits; `loop` is the one training loop (accelerate) with exact resume; `multitask`
samples batches across tasks and adds tasks to a trained adapter; `schedule` parses rank
schedules and rebuilds AdamW's moments across a rank cut; `metrics` scores predictions.
"""
