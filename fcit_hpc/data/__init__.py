"""The data room: the sample every part of the code passes around, its collation into training
batches, and image loading. Imports nothing of fcit_hpc above ``config``."""
