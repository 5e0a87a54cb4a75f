"""The self-contained HTML pages: the explain report, the compare report, and what they share."""
