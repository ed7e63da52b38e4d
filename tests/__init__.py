"""kubetune tests: unit/, integration/ (against the real test bed), bench/."""
