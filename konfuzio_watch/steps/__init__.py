"""The steps, one module per state (the table that maps states to them is ``pipeline.py``):

``claim`` (inbox -> claiming -> claimed), ``upload`` (claimed -> uploading), ``send`` (uploading ->
uploaded, the upload's POST), ``reconcile`` (uploading, after a crash or an ambiguous error: does the
server have it?), ``fetch`` (uploaded -> exporting: is it done?), ``export`` (exporting -> done),
``fail`` (failing -> failed), ``refresh`` (done -> done: a new revision). Below them ``context``
(move, fail, apply a decision), ``documents`` (a result fetched from Konfuzio) and ``probes`` (is a
blocked gate open again?).
"""
