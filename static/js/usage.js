// The Admin Dashboard's Usage tab: the period's totals, a chart of each day's tokens (an SVG drawn here,
// nothing loaded from elsewhere) and a row per user and model. Picking another period asks
// GET /api/admin/usage?days=N and draws it again.
(function () {
  "use strict";

  const SVG = "http://www.w3.org/2000/svg";
  const period = document.getElementById("usage-period");
  const errorBox = document.getElementById("error");
  const range = document.getElementById("usage-range");
  const chart = document.getElementById("usage-chart");
  const rowsBody = document.getElementById("usage-rows");
  const empty = document.getElementById("usage-empty");
  let report = JSON.parse(document.getElementById("usage-data").textContent);

  const number = new Intl.NumberFormat();
  const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = !message;
  }

  function duration(seconds) {
    if (seconds === 0) return "0 s";
    if (seconds < 60) return (seconds < 10 ? seconds.toFixed(2) : seconds.toFixed(1)) + " s";
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return minutes + " min " + Math.round(seconds - minutes * 60) + " s";
    return Math.floor(minutes / 60) + " h " + (minutes % 60) + " min";
  }

  function dayLabel(iso) {
    const [, month, day] = iso.split("-").map(Number);
    return MONTHS[month - 1] + " " + day;
  }

  function drawTotals() {
    const totals = report.totals;
    document.querySelectorAll("[data-total]").forEach((dd) => {
      const key = dd.dataset.total;
      dd.textContent = key.endsWith("_seconds") ? duration(totals[key]) : number.format(totals[key]);
    });
    range.textContent = report.days === 1 ? "Today, " + dayLabel(report.until) + "."
      : dayLabel(report.since) + " to " + dayLabel(report.until) + " (" + report.days + " days).";
  }

  function cell(text, className, note) {
    const td = document.createElement("td");
    td.className = className;
    td.textContent = text;
    if (note) {
      const small = document.createElement("span");
      small.className = "per-request";
      small.textContent = note;
      td.append(small);
    }
    return td;
  }

  function drawRows() {
    rowsBody.replaceChildren(...report.rows.map((row) => {
      const tr = document.createElement("tr");
      tr.className = "usage-row";
      tr.dataset.user = row.user;
      tr.dataset.model = row.model;
      const each = (seconds) => row.requests ? duration(seconds / row.requests) + " per request" : "";
      tr.append(
        cell(row.user, "user-cell"),
        cell(row.model, "model-cell"),
        cell(number.format(row.requests), "number requests"),
        cell(number.format(row.prompt_tokens), "number prompt-tokens"),
        cell(number.format(row.completion_tokens), "number completion-tokens"),
        cell(duration(row.hold_seconds), "number hold", each(row.hold_seconds)),
        cell(duration(row.generation_seconds), "number generation", each(row.generation_seconds)),
      );
      return tr;
    }));
    empty.hidden = report.rows.length > 0;
  }

  function element(name, attributes, text) {
    const node = document.createElementNS(SVG, name);
    Object.entries(attributes).forEach(([key, value]) => node.setAttribute(key, String(value)));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A round top for the axis (1, 2 or 5 times a power of ten per step), with four steps.
  function scale(most) {
    if (most <= 0) return { top: 4, step: 1 };
    const rough = most / 4;
    const power = Math.pow(10, Math.floor(Math.log10(rough)));
    const step = [1, 2, 5, 10].map((f) => f * power).find((s) => s >= rough);
    return { top: step * 4, step };
  }

  function shortNumber(value) {
    if (value >= 1e6) return (value / 1e6).toFixed(value % 1e6 ? 1 : 0) + "M";
    if (value >= 1e3) return (value / 1e3).toFixed(value % 1e3 ? 1 : 0) + "k";
    return String(value);
  }

  function drawChart() {
    const days = report.per_day;
    const width = Math.max(chart.clientWidth, 320);
    const height = 240;
    const left = 52, right = 12, top = 12, bottom = 28;
    const plotWidth = width - left - right, plotHeight = height - top - bottom;
    const most = Math.max(0, ...days.map((d) => d.prompt_tokens + d.completion_tokens));
    const { top: axisTop, step } = scale(most);
    const y = (value) => top + plotHeight - (value / axisTop) * plotHeight;
    const svg = element("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "usage-svg" });
    for (let value = 0; value <= axisTop; value += step) {
      svg.append(element("line", { x1: left, x2: width - right, y1: y(value), y2: y(value), class: value ? "grid" : "axis" }));
      svg.append(element("text", { x: left - 8, y: y(value) + 4, class: "tick", "text-anchor": "end" }, shortNumber(value)));
    }
    const slot = plotWidth / days.length;
    const barWidth = Math.max(1, Math.min(36, slot * 0.7));
    const labelEvery = Math.ceil(days.length / Math.max(1, Math.floor(plotWidth / 64)));
    days.forEach((day, index) => {
      const x = left + slot * index + (slot - barWidth) / 2;
      const group = element("g", { class: "day", "data-day": day.day });
      group.append(element("title", {}, dayLabel(day.day) + ": " + number.format(day.prompt_tokens) + " prompt and "
        + number.format(day.completion_tokens) + " completion tokens, " + number.format(day.requests)
        + (day.requests === 1 ? " request" : " requests")));
      group.append(element("rect", { x: left + slot * index, y: top, width: slot, height: plotHeight, class: "hover" }));
      const promptTop = y(day.prompt_tokens);
      const total = y(day.prompt_tokens + day.completion_tokens);
      if (day.prompt_tokens) group.append(element("rect", { x, y: promptTop, width: barWidth, height: y(0) - promptTop, class: "bar prompt" }));
      if (day.completion_tokens) group.append(element("rect", { x, y: total, width: barWidth, height: promptTop - total, class: "bar completion" }));
      if (index % labelEvery === 0) {
        group.append(element("text", { x: left + slot * (index + 0.5), y: height - 8, class: "tick", "text-anchor": "middle" }, dayLabel(day.day)));
      }
      svg.append(group);
    });
    if (!most) {
      svg.append(element("text", { x: left + plotWidth / 2, y: top + plotHeight / 2, class: "chart-empty", "text-anchor": "middle" },
        "No tokens in this period"));
    }
    chart.replaceChildren(svg);
    chart.setAttribute("aria-label", "Tokens per day, " + dayLabel(report.since) + " to " + dayLabel(report.until)
      + ": " + number.format(report.totals.prompt_tokens + report.totals.completion_tokens) + " in all");
  }

  function draw() {
    drawTotals();
    drawRows();
    drawChart();
  }

  period.addEventListener("change", async () => {
    const days = period.value;
    period.disabled = true;
    try {
      report = await window.gantry.api("GET", "/api/admin/usage?days=" + encodeURIComponent(days));
      showError("");
      history.replaceState(null, "", "?days=" + encodeURIComponent(days));
      draw();
    } catch (error) {
      showError(error.message);
    } finally {
      period.disabled = false;
    }
  });

  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(drawChart, 100);
  });

  draw();
})();
