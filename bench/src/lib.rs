//! Load generators and benchmark helpers.
