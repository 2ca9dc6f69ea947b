"""Presentation: what a trace's analysis looks like to a reader (text, JSON, HTML, figures,
Perfetto, diffs). Each renderer takes a `cmtrace.analysis.Trace` and returns text or bytes; the
commands in cmtrace.cli decide where they go. Nothing here parses arguments or imports bcc.
"""
