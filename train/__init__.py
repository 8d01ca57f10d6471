"""Training Mini-Omni's stages on `omniflow.model` (see train/README.md).

    omniflow train preprocess --source data.jsonl --out cache/ --tokenizer ckpt/
    omniflow train stage1 --data cache/ --init ckpt/ --out runs/stage1
"""
