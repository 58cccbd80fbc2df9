#!/usr/bin/perl
# Extracts the command table of MARS's perl marsadm (userspace/marsadm, %cmd_table) into
# mars-commands.txt:
#   git -C MARS show HEAD:userspace/marsadm | perl extract-mars-commands.pl | sort
# Prints every key of %cmd_table in MARS's userspace/marsadm with its kind:
#   base       listed by `marsadm --help` (no "verbose N" line)
#   verbose-N  listed only with --verbose=N (deprecated or expert)
#   handler:X  a plain handler (ignore_cmd, senseless_cmd, nyi_cmd, forbidden_cmd, ...)
my $in = 0; my ($name, $kind);
while (<>) {
  if (/^my %cmd_table =/) { $in = 1; next; }
  next unless $in;
  last if /^  \);/;
  if (/^   "([a-z0-9-]+)"\s*=>\s*\\&(\w+)/) { print "$1 handler:$2\n"; next; }
  if (/^   "([a-z0-9-]+)"\s*$/) { print "$name $kind\n" if $name; $name = $1; $kind = "base"; next; }
  if ($name && /^\s+"verbose (\d+)"/ && $kind eq "base") { $kind = "verbose-$1"; }
}
print "$name $kind\n" if $name;
