#!/bin/sh
# Portable build: no -march; ISA-specific code is selected at run time inside the library.
set -e
cd "$(dirname "$0")"
CXX=${CXX:-g++}
time $CXX -std=c++17 -O3 -fPIC -shared -pthread -fno-math-errno -o wq_linear.so wq_linear.cc
time $CXX -std=c++17 -O3 -fPIC -shared -fopenmp -DWQ_USE_OPENMP -fno-math-errno -o wq_linear_omp.so wq_linear.cc
