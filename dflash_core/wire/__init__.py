"""The wire contract of the hidden-state service (DESIGN 2.4): generated stubs and the tensor codec."""
