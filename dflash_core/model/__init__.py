"""The DFlash drafter and the frozen verifier parts it borrows."""
