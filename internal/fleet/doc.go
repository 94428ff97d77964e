// Package fleet is what several Cascata instances sharing one control
// database ([catalog].url) agree on besides the catalog itself: who is
// alive (heartbeats), each instance's share of the per-host backend cap, and
// pauses that hold a project on every live instance before a cutover.
package fleet
