"""The GradualDiff-Fed delta codec: what a client sends and how the aggregator checks it.

`encoding` turns `local - global` into a compressed safetensors file, `decoding` turns one back,
`container` holds the names and arithmetic both share, and `precheck` bounds a file's size and
checks its header against the layout the run prescribes before anything of its body is read.
Pure: tensors and bytes in and out, no storage, no clock.
"""
