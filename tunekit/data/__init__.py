"""Training data: the streaming JSONL validator and conversion between row kinds.

    validate(path, rules=None, tokenizer=None, max_problems=100) -> ValidationReport
    iter_rows(path)                  -> (line, row) pairs of a validated file
    to_chat_row(row, kind)           -> the chat form of one row
    convert_file(src, dst, target)   -> rows written
    guess_kind(row)                  -> the RowKind a row's keys point to (None when none)
    data_entry(report)               -> what a job records of a validated file (path, sha256, rows, kind)
"""

from tunekit.data._checks import guess_kind
from tunekit.data.convert import convert_file, convert_row, iter_rows, to_chat_row
from tunekit.data.validator import data_entry, validate

__all__ = ["convert_file", "convert_row", "data_entry", "guess_kind", "iter_rows", "to_chat_row", "validate"]
