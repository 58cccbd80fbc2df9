#!/usr/bin/perl
# Prints every view macro name of MARS's perl marsadm, one a line, sorted: the keys of its
# %complex_macros and the brace expansions of its %trivial_globs, exactly as marsadm builds
# %view_macros (lamport_glob = perl's glob, in a directory where no name exists).
# Usage: git -C MARS show HEAD:userspace/marsadm | perl extract-mars-macros.pl > mars-macros.txt
use strict;
use warnings;
my $src = do { local $/; <STDIN> };
my ($complex) = $src =~ m/^my %complex_macros =\n(.*?)^my %view_macros/ms or die "no %complex_macros\n";
my ($trivial) = $src =~ m/^my %trivial_globs =\n(.*?)^my \$glob = ""/ms or die "no %trivial_globs\n";
my %complex = eval $complex; die $@ if $@;
my %trivial = eval $trivial; die $@ if $@;
chdir(File::Spec->tmpdir) if eval { require File::Spec; 1 };
my %names = map { $_ => "complex" } keys %complex;
my $glob = join(",", sort keys %trivial);
$names{$_} //= "primitive" foreach glob("{$glob}");
print "$names{$_} $_\n" foreach sort keys %names;
