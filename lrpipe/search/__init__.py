"""Finding the rate: the LR range test (``rangetest``; over seeds in ``seeds``), the suggestion
rules read off its curve (``suggest``), and the halving search, grid and regret that choose
(``choose``)."""
