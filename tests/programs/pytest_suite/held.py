"""What the suite's tests keep alive on purpose: an fd referenced from here stays open (no
finalizer closes it), which is what a leak is."""

HELD: list = []
