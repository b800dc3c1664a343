"""The hidden-state service's wire (docs/architecture.md): generated stubs and the tensor codec."""
