"""Watching a deployed model: the prediction log its commands write (`log`), the reference saved with it at
training (`reference`) and the drift, realized performance and alerts `cxr monitor` computes from both
(`drift`)."""
