"""Yamaha RTX router driver: the SMTP policy route (`ip filter N pass * * tcp * smtp` and
`ip route default gateway G filter N gateway OTHERWISE`), read and changed safely.

config  -- `show config` parser/printer and the semantics of the modelled commands
policy  -- desired `SmtpRoute` -> minimal, MR009-ordered command list; the planner's filter and
           route steps -> the exact lines, refusing what is not mailrec's (pure)
queries -- what each filter does to the office's SMTP traffic; which lines use a filter number
session -- one SSH CLI session (prompts, pager, administrator, save question, errors)
driver  -- `RtxDriver.observe()` / `.apply()` and `RouterFacts` for the core

Import from the submodules: the package re-exports nothing, so reading a router's saved
config (`config`, `queries`) does not load paramiko (`session`).
"""
