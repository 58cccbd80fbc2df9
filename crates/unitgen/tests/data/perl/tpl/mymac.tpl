# c
<%{0}|%{1}|%{2}|%{callstack}>