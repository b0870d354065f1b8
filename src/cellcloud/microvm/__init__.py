"""microVM execution environments (issue #18), first slice: the guest image and the
acceleration probe. Not yet an environment backend: see docs/microvm.md."""
