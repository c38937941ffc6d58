"""Facts of the published FCIT protocol that tests check the code against."""

# The published Het-FCIT assignment tables (0-based task / stage ids; one row per stage, one
# entry per selected client), written out here rather than taken from the code under test.
PUBLISHED_HET_TASK = [
    [1, 2, 4, 5, 6],
    [3, 4, 5, 7, 7],
    [0, 2, 3, 4, 5],
    [0, 0, 1, 3, 7],
    [1, 2, 4, 4, 5],
    [0, 3, 5, 7, 7],
    [2, 2, 5, 7, 7],
    [5, 5, 5, 6, 6],
]
PUBLISHED_HET_CAPABILITY = [[0, 1, 1, 3, 3], [0, 2, 2, 2, 3], [1, 2, 2, 3, 3], [0, 0, 0, 1, 1]]
