"""Where weights live, how to get them, and the demo set: one module per job.

    components  the components and the files each one holds (the one list everything reads)
    resolve     explicit path / hub repo id -> $OMNIFLOW_HOME/<component> -> an error naming the fix
    hub         downloads of the official files (Hugging Face Hub, openai-whisper's URL table)
    demo        `omniflow fetch --demo`: random weights in the official formats (demo_tokenizer:
                its tokenizer.json)
    fetch       `omniflow fetch` (the command line)

The names nodes and tools use are re-exported here: `from omniflow.model import weights;
weights.resolve("snac")`. Nothing here imports torch until a demo writer runs.
"""
from .components import (COMPONENTS, DEFAULT_HOME, DEMO_MARKER, FETCH_HINT, HOME_ENV,
                         MINIOMNI_CONFIG_FILE, MINIOMNI_WEIGHTS_FILE, RUN_LATEST_FILE, SNAC_CONFIG_FILE,
                         SNAC_WEIGHTS_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_FILES,
                         WHISPER_PREFIX, Component, component_dirs, describe, home, missing_files,
                         whisper_size)
from .demo import (DEMO_SEED, INIT_STD, MINIOMNI_TRUNK, SNAC_CONFIG, WHISPER_DIMS, miniomni_config,
                   write_demo, write_demo_miniomni, write_demo_snac, write_demo_whisper)
from .demo_tokenizer import write_demo_tokenizer
from .resolve import WeightsNotFound, checkpoint_dir, is_demo, resolve, resolve_whisper, warn_if_demo

__all__ = ["COMPONENTS", "DEFAULT_HOME", "DEMO_MARKER", "FETCH_HINT", "HOME_ENV", "RUN_LATEST_FILE",
           "MINIOMNI_CONFIG_FILE", "MINIOMNI_WEIGHTS_FILE", "SNAC_CONFIG_FILE", "SNAC_WEIGHTS_FILE",
           "TOKENIZER_CONFIG_FILE", "TOKENIZER_FILE", "TOKENIZER_FILES",
           "WHISPER_PREFIX",
           "Component", "component_dirs", "describe", "home", "missing_files", "whisper_size",
           "DEMO_SEED", "INIT_STD", "MINIOMNI_TRUNK", "SNAC_CONFIG", "WHISPER_DIMS", "miniomni_config",
           "write_demo", "write_demo_miniomni", "write_demo_snac", "write_demo_whisper",
           "write_demo_tokenizer", "WeightsNotFound", "checkpoint_dir", "is_demo", "resolve", "resolve_whisper", "warn_if_demo"]
