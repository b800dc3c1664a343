"""dflash_core: the DFlash library shared by the services and the CLI (no service code here)."""
