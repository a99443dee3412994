"""BlueFog 0.3's ``bluefog.torch`` API on top of decomm (work in progress)."""
