/* cloudmail's cloud jobs pages: live progress and confirmation dialogs.
 *
 * Every page works without this script: the counters are right when the page is
 * served and each action has its own confirmation page. With it, the job pages poll
 * their JSON endpoint and update bars, counters, status, actions and the chart in
 * place, and actions are confirmed with a dialog instead of a second page.
 */
(function () {
  "use strict";

  var POLL_MS = 1500;
  var numbers = new Intl.NumberFormat("en");

  function confirmActions() {
    document.addEventListener("submit", function (event) {
      var form = event.target;
      if (!form.matches || !form.matches("form[data-cm-confirm]")) return;
      event.preventDefault();
      if (!window.confirm(form.getAttribute("data-cm-confirm"))) return;
      var field = document.createElement("input");
      field.type = "hidden";
      field.name = "confirmed";
      field.value = "yes";
      form.appendChild(field);
      form.submit(); // does not fire "submit" again
    });
  }

  function getJSON(url) {
    return fetch(url, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    }).then(function (response) {
      if (!response.ok) throw new Error("cloudmail: " + url + " answered " + response.status);
      return response.json();
    });
  }

  function updateBar(bar, segments) {
    var parts = [];
    segments.forEach(function (segment) {
      var element = bar.querySelector('[data-cm-seg="' + segment.outcome + '"]');
      if (element) {
        element.style.width = segment.percent + "%";
        element.title = numbers.format(segment.count) + " " + segment.outcome;
      }
      if (segment.count) parts.push(numbers.format(segment.count) + " " + segment.outcome);
    });
    bar.setAttribute("aria-label", parts.join(", ") || "no recipients");
  }

  function updateJob(scope, job) {
    scope.querySelectorAll("[data-cm-bar]").forEach(function (bar) {
      updateBar(bar, job.segments);
    });
    scope.querySelectorAll("[data-cm-counter]").forEach(function (element) {
      var value = job.counters[element.getAttribute("data-cm-counter")];
      if (value !== undefined) element.textContent = numbers.format(value);
    });
    scope.querySelectorAll("[data-cm-status]").forEach(function (badge) {
      badge.textContent = job.status;
      badge.className = "cm-status cm-status-" + job.status;
    });
  }

  function watchJob(root) {
    var url = root.getAttribute("data-cm-job-live");
    var status = root.getAttribute("data-cm-job-status");
    var announce = root.querySelector("[data-cm-announce]");

    function tick() {
      if (document.hidden) return setTimeout(tick, POLL_MS);
      getJSON(url)
        .then(function (job) {
          updateJob(root, job);
          root.querySelectorAll("[data-cm-action]").forEach(function (holder) {
            holder.hidden = job.actions.indexOf(holder.getAttribute("data-cm-action")) < 0;
          });
          var batches = root.querySelector("[data-cm-batches]");
          var names = Object.keys(job.batches).sort();
          if (batches && names.length) {
            batches.textContent = names.map(function (name) {
              return numbers.format(job.batches[name]) + " " + name;
            }).join(", ");
          }
          var chart = root.querySelector("[data-cm-chart]");
          if (chart && job.chart_html) chart.innerHTML = job.chart_html;
          if (job.status !== status) {
            if (announce) announce.textContent = "Job is now " + job.status + ".";
            status = job.status;
            root.setAttribute("data-cm-job-status", status);
          }
          if (job.live) setTimeout(tick, POLL_MS);
        })
        .catch(function (error) {
          console.error("cloudmail: progress update failed:", error);
          setTimeout(tick, POLL_MS * 4);
        });
    }

    if (["queued", "sending", "paused"].indexOf(status) >= 0) setTimeout(tick, POLL_MS);
  }

  function watchList(table) {
    var base = table.getAttribute("data-cm-jobs");

    function tick() {
      var rows = table.querySelectorAll("tr[data-cm-live]");
      if (!rows.length) return;
      if (document.hidden) return setTimeout(tick, POLL_MS);
      var query = Array.prototype.map.call(rows, function (row) {
        return "id=" + encodeURIComponent(row.getAttribute("data-cm-job"));
      }).join("&");
      getJSON(base + "?" + query)
        .then(function (data) {
          data.jobs.forEach(function (job) {
            var row = table.querySelector('tr[data-cm-job="' + job.id + '"]');
            if (!row) return;
            updateJob(row, job);
            if (!job.live) row.removeAttribute("data-cm-live");
          });
          setTimeout(tick, POLL_MS);
        })
        .catch(function (error) {
          console.error("cloudmail: progress update failed:", error);
          setTimeout(tick, POLL_MS * 4);
        });
    }

    setTimeout(tick, POLL_MS);
  }

  confirmActions();
  document.querySelectorAll("[data-cm-job-live]").forEach(watchJob);
  document.querySelectorAll("table[data-cm-jobs]").forEach(watchList);
})();
