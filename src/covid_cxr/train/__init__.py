"""Training: the paper's phased schedule over a prepared fold (``runner``), one epoch at a time
(``engine``), fed uint8 batches from the cache (``loader``) and augmented on the device (``augment``);
``distributed`` adds torchrun data parallelism and ``progress`` the live display."""
