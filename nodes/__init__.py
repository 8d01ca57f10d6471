"""Node classes for the Mini-Omni graphs. Importing the package registers the model's frame kinds."""
import omniflow.model.kinds  # noqa: F401  (registers features, embeds, tokens, codes, speech)
