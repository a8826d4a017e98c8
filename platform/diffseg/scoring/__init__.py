"""What every segmenter is scored by: the metrics (mIoU, IEM Acc/IoU/DICE, Hungarian matching) and the `Segmenter`
protocol. Below the methods, which implement the protocol and score their own diagnostics."""
