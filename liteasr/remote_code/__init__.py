"""The lite-whisper format as self-contained modules (torch and transformers imports only).

`save_pretrained` copies these files beside the weights, so a checkpoint loads with
`AutoModel.from_pretrained(dir, trust_remote_code=True)` on a machine without liteasr, as the published
efficient-speech/lite-whisper-* checkpoints do. `liteasr.modeling` imports the classes from here, so they are
defined once.
"""

__all__: list[str] = []
